# A/B of image decoding and PNG writing in a thread pool (fourteenth round): OLD = a worktree of the commit
# before, NEW = this tree; RUN = a bottle run (the suite's seed 0). Rounds alternate; one job on the machine.
OLD=${OLD:-/tmp/s15/old}; NEW=${NEW:-$(pwd)}; RUN=${RUN:-/tmp/s13/work/runs/bottle_seed0}
uptime
for r in 1 2 3; do
  for v in old new; do
    if [ $v = old ]; then S=$OLD/src; else S=$NEW/src; fi
    echo "== $v round $r"
    PYTHONPATH=$S $NEW/.venv/bin/python $NEW/bench/results/r14/predict_throughput.py $RUN 2>&1 | tail -2
    rm -rf /tmp/pout_ab
    /usr/bin/time -f "cli predict %e s, peak %M KB" env PYTHONPATH=$S $NEW/.venv/bin/python -m fastflow predict $RUN \
      /work/shared/data/mvtec_ad/bottle/test --output /tmp/pout_ab --quiet 2>&1 | tail -1
    du -sk /tmp/pout_ab | cut -f1 | sed 's/^/output KB /'
  done
done
uptime
