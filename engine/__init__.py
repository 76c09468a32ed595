"""The evolutionary loop: ask/tell engine, run settings, genome safety and executors."""
from engine.candidate import Candidate, EvalResult
from engine.config import RunConfig
from engine.genome import GenomeError, check_genome, code_hash, compile_genome

__all__ = ["Candidate", "EvalResult", "GenomeError", "RunConfig", "check_genome", "code_hash", "compile_genome"]
