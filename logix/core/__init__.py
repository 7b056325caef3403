"""Building blocks shared by every phase: projections, running statistics, ranks, dtypes."""
