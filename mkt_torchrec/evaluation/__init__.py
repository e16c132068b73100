"""Offline evaluation metrics (exact AUC and impression-weighted GAUC)."""
