"""Prefect flows and tasks that orchestrate the nanopipe stages."""
