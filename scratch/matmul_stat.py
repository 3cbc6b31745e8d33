import statistics, math, sys, json
import ossrl.envs.matmul as mm
rec = []
class S:
    fmean = staticmethod(statistics.fmean)
    def median(xs):
        rec.append(list(xs)); return statistics.median(xs)
mm.statistics = S
out = {"FAST": [], "NAIVE": []}
for rep in range(int(sys.argv[1])):
    for name, src in (("FAST", mm.FAST_KERNEL), ("NAIVE", mm.NAIVE_KERNEL)):
        rec.clear()
        r = mm.evaluate_kernel(src, sizes=(32, 64), seed=rep, trials=int(sys.argv[2]))
        # rec alternates ref, cand per size
        med = []; mn = []
        for i in range(0, len(rec), 2):
            ref, cand = rec[i], rec[i+1]
            med.append(statistics.median(ref)/statistics.median(cand)); mn.append(min(ref)/min(cand))
        gm = lambda v: math.exp(statistics.fmean(math.log(x) for x in v))
        out[name].append((gm(med), gm(mn)))
for k, v in out.items():
    meds = [a for a, b in v]; mins = [b for a, b in v]
    print(k, "median-stat: mean %.3f min %.3f max %.3f sd %.3f" % (statistics.fmean(meds), min(meds), max(meds), statistics.pstdev(meds)))
    print(k, "min-stat:    mean %.3f min %.3f max %.3f sd %.3f" % (statistics.fmean(mins), min(mins), max(mins), statistics.pstdev(mins)))
