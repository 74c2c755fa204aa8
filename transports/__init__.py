"""backhaul.transports: one module per wire family; they see only backhaul.core."""
