"""Reads the reports scripts/test-clients collected (each client's own files) and
checks that every request succeeded and that lm-eval's scores on inferd are within
the standard error of transformers' on the same tasks.
    python check_clients.py OUT_DIR GOLDENS_JSON"""
import glob
import json
import os
import sys

out, goldens_path = sys.argv[1], sys.argv[2]
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


for endpoint in ["chat", "completions"]:
    report = json.load(open(os.path.join(out, f"aiperf-{endpoint}", "profile_export_aiperf.json")))
    count = report["request_count"]["avg"]
    errors = (report.get("error_request_count") or {}).get("avg", 0)
    check(count == 24 and not errors and not report.get("error_summary"),
          f"aiperf {endpoint}: {count} requests, {errors} errors, "
          f"{report['output_token_throughput']['avg']:.1f} output tokens/s, "
          f"TTFT p50 {report['time_to_first_token']['p50']:.1f} ms")

goldens = json.load(open(goldens_path))
for name, task, metric in [("completions", "inferd_tiny_mc", "acc,none"),
                           ("chat", "inferd_tiny_gen", "exact_match,last_word")]:
    files = glob.glob(os.path.join(out, f"lm-eval-{name}", "*", "results_*.json"))
    check(len(files) == 1, f"lm-eval {name}: one results file")
    if not files:
        continue
    results = json.load(open(files[0]))["results"][task]
    got = results[metric]
    want = goldens[task][metric]
    stderr = goldens[task][metric.replace(",", "_stderr,")]
    check(abs(got - want) <= stderr,
          f"lm-eval {name} {task} {metric}: inferd {got:.4f}, transformers {want:.4f} ± {stderr:.4f}")

for kind in ["chat", "text"]:
    folder = os.path.join(out, f"guidellm-{kind}")
    if not os.path.isdir(folder):
        continue  # guidellm did not run (no torch venv)
    report = json.load(open(os.path.join(folder, "report.json")))
    for benchmark in report["benchmarks"]:
        totals = benchmark["metrics"]["request_totals"]
        check(totals["errored"] == 0 and totals["incomplete"] == 0 and totals["successful"] == 8,
              f"guidellm {kind}: {totals['successful']} successful, {totals['errored']} errored, "
              f"{benchmark['metrics']['output_tokens_per_second']['successful']['mean']:.1f} output tokens/s")

sys.exit(1 if failures else 0)
