"""Reusable building blocks: sparse lookup, sequence attention, HFA, MMoE, gates."""
