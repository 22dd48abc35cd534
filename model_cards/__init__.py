"""Model card templates and the cards of published results.

This folder installs as the package data ``hf_sbp.model_cards`` (see ``pyproject.toml``), so the card
template is found both in a source checkout and in an installed wheel.
"""
