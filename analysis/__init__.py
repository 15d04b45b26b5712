"""Analysis of study runs: collect from MLflow, tables, plots."""
