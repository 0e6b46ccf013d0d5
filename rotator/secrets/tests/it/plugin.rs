//! Plugin provider tests (being written).
