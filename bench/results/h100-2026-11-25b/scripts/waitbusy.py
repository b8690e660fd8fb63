"""Wait (up to 90 s) until process PID uses more than 0.3 of a core over 0.5 s: python waitbusy.py PID"""
import os, sys, time
pid = sys.argv[1]
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
t0 = time.time()
while time.time() - t0 < 90:
    a = cpu(); time.sleep(0.5); u = (cpu() - a) / 0.5
    if u > 0.3:
        print(f"busy after {time.time() - t0:.1f} s ({u:.2f} cores)"); break
