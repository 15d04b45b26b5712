"""recall-study: reproducibility and ablation harness for the recall loss paper."""
__version__ = "0.1.0"
