"""Sharding plans: TorchRec's planner for a given topology, plan files (``mkt plan``) and loading them back."""
