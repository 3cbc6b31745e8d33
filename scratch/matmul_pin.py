import statistics, sys
import ossrl.envs.matmul as mm
pin = sys.argv[1] == "pin"
if not pin:
    mm.pin_to_one_cpu = lambda *pids: None
vals = [mm.evaluate_kernel(mm.NAIVE_KERNEL, seed=r).speedup for r in range(int(sys.argv[2]))]
fast = [mm.evaluate_kernel(mm.FAST_KERNEL, seed=r).speedup for r in range(int(sys.argv[2]))]
print(sys.argv[1], "naive/naive mean %.3f min %.3f max %.3f sd %.3f" % (statistics.fmean(vals), min(vals), max(vals), statistics.pstdev(vals)))
print(sys.argv[1], "fast mean %.3f min %.3f max %.3f sd %.3f" % (statistics.fmean(fast), min(fast), max(fast), statistics.pstdev(fast)))
