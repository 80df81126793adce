"""Tools run with ``python -m``: compare backbones, probe them, fetch/convert weights, curvature."""
