"""rlhn_assets: clean retriever training data with a cascade of LLM judges (RLHN), as Dagster assets in DuckDB."""
