"""BiSSL: bilevel self-supervised learning (arXiv 2410.02387) as an importable package."""
