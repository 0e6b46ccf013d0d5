//! The in-process Azure Key Vault (being written).
