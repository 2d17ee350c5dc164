"""Masking strategies, one module each; see mrmae/train/masking.py for the contract.

Every module here (not starting with "_") is imported when the registry is first asked,
so a new strategy is a new file in this folder and nothing else.
"""
