"""Prefect flows and deployments of lmpipe (orchestration only; stages live in src/lmpipe)."""
