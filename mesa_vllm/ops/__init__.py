"""Attention operators: the dense reference of the Mesa contract and the fast paths."""
