"""DiS models: the backbone, its registry and analytic parameter/FLOP counts."""

from dis_dist.models.dis import MODEL_NAMES, DiS, build_model, parse_model_name

__all__ = ["MODEL_NAMES", "DiS", "build_model", "parse_model_name"]
