"""The ERPD pipeline: collect -> teachers (stage 1) -> signals -> students (stage 2) -> on-policy -> eval -> report."""
