"""`hf-attnres ab`: whether converting a Llama to AttnRes and training it beats training the same Llama.

    from hf_attnres.ab import ABConfig, run_ab
    result = run_ab(ABConfig(model="llama/", output_dir="runs/ab", max_steps=200))
"""

from .run import ABConfig, run_ab
from .stats import PairedDifference, paired_difference, student_t_quantile

__all__ = ["ABConfig", "PairedDifference", "paired_difference", "run_ab", "student_t_quantile"]
