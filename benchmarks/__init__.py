"""wq_memo's benchmark suite: every scenario side by side with the peers, in one run.

Run ``python -m benchmarks`` (``--quick`` for a smoke run, ``--out DIR`` for where the chart
and the results go). Figures are medians over interleaved rounds; the tables quote each
contender's ratio to a named reference, because ratios travel between machines and absolute
times do not.
"""
