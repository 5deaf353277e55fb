"""Print the calls around each slow step of an engine_speed.json (engine_speed.py engine's per-call
times and the launch time of the step each call launched): where a slow call spent its time."""
import json
import sys

for r in json.load(open(sys.argv[1]))["runs"]:
    calls, launches = r.get("call_ms", []), r.get("next_launch_ms", [])
    print(f"{r['requests']} x ({r['prompt_len']} + {r['output_len']}): {r['seconds']:.2f} s, ratio {r['ratio']:.3f}, "
          f"steps > 2x median {r['steps_over_2x_median']}, gc {r.get('gc_collections')}, "
          f"compiles {len(r.get('triton_compiles_while_serving', []))}")
    for s in r.get("slow_steps", []):
        i = s["index"]
        around = [(j, calls[j], launches[j]) for j in range(max(0, i - 2), min(len(calls), i + 3))]
        print(f"  slow {s['kind']} #{i}: {s['ms']:.1f} ms, {s['tokens']} tokens, {s['seqs']} seqs, "
              f"wait {s['wait'] * 1e3:.1f} ms, next launch {s.get('next_launch', 0) * 1e3:.1f} ms "
              f"(execute {s.get('next_execute', 0) * 1e3:.1f}); calls (index, ms, launch ms): {around}")
