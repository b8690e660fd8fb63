"""Map the profile's top kernels (bench json rows kind=kernel) to their HLO fusions' op_names.
usage: hlo_map.py ROWS.jsonl DUMP_DIR OUT.txt"""
import collections, json, re, sys
from pathlib import Path

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
kern = [r for r in rows if r.get("bench") in ("profile", "moe_profile") and r.get("kind") == "kernel"]
files = sorted(Path(sys.argv[2]).glob("*after_optimizations.txt"), key=lambda p: p.stat().st_size)
text = files[-1].read_text() if files else ""
out = [f"module: {files[-1].name if files else None} ({len(text)} chars); {len(files)} files"]
comps = {}
for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) \(.*?\{\n(.*?)\n\}", text, re.S | re.M):
    comps[m.group(1)] = m.group(2)
for r in kern[:60]:
    name = r["name"]
    out.append(f"\n== {name}  {r['ms_per_step']:.3f} ms/step  calls {r['calls_per_step']:.0f}  kernel {r.get('kernel', '')[:60]}")
    m = re.search(r"^\s*(?:ROOT )?%?" + re.escape(name) + r" = (.*)$", text, re.M)
    if not m:
        out.append("   (not found in the dump)")
        continue
    line = m.group(1)
    out.append("   " + line[:400])
    c = re.search(r"calls=%?([\w.\-]+)", line)
    if c and c.group(1) in comps:
        body = comps[c.group(1)]
        ops = collections.Counter(re.findall(r'op_name="([^"]+)"', body))
        for op, n in ops.most_common(12):
            out.append(f"     {n:4d}  {op[:200]}")
        shapes = collections.Counter(re.findall(r"= (\w+\[[\d,]*\])", body))
        out.append("     shapes: " + ", ".join(f"{s} x{n}" for s, n in shapes.most_common(6)))
Path(sys.argv[3]).write_text("\n".join(out) + "\n")
print("\n".join(out[:200]))
