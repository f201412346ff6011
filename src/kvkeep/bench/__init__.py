"""Speed benchmarks: ``kvkeep bench`` (:mod:`.speed`, one static batch)."""
