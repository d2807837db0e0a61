"""The machine description, the target verdicts and the Markdown report, all from the results dict."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Final

from bench import serving_scale
from bench.serving_scale import count_label
from bench.models import ML_1M, synthetic_name

REPO: Final = Path(__file__).resolve().parent.parent
MISSING: Final = "–"
ROLES: Final = ("serve", "java", "preload", "worker")  # see bench.served.HostServer.pss_mb
MILLION: Final = synthetic_name(1_000_000)
ONE_USER_MS: Final = 3.0
BATCH_USER_MS: Final = 1.0
MILLION_USER_MS: Final = 10.0
HISTORY_ADDED_MS: Final = 5.0  # issue 11: the user-history read adds at most this to the p50
OPEN_TO_HEALTHY: Final = 2.0  # issue 11: p50 with the breaker open <= this times the healthy p50
EVENT_RATE_SHARE: Final = 0.95  # of the offered rate: the last events' drain counts in the elapsed time
_VERDICT: Final = {True: "met", False: "**not met**", None: "not measured"}
OUTAGES: Final = {"refused": "refusing connections (server killed)", "hang": "hanging (latency far above the deadline)"}


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, load, git commit and library versions of this run."""
    import numpy
    import psutil
    import xgboost

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else "unknown"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "commit": git("rev-parse", "--short=12", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "xgboost": xgboost.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each met / not met with the numbers behind it (skipped if not measured).

    The quick run has no ML-1M: the in-process and served ML-1M targets are checked on its small
    synthetic model instead, and the verdict names the model it was measured on.
    """
    out: list[dict[str, Any]] = []

    def add(name: str, measured: str | None, met: bool | None) -> None:
        out.append({"target": name, "measured": measured or "not measured in this run", "met": met})

    inprocess = r.get("inprocess", {})
    small = ML_1M if ML_1M in inprocess else next((n for n in inprocess if n != MILLION), None)
    local = inprocess.get(small) if small else None
    add(f"ML-1M one user in-process: handler p50 <= {ONE_USER_MS:g} ms",
        f"{small}: {_pp(local['handler_ms'])} ms (p50 / p99)" if local else None,
        local["handler_ms"]["p50"] <= ONE_USER_MS if local else None)
    batch = r.get("batch", {})
    hundred = batch.get("inprocess", {}).get("100")
    add(f"ML-1M batch of 100 users in-process: <= {BATCH_USER_MS:g} ms per user (request p50 / 100)",
        f"{batch.get('model', '?')}: {hundred['per_user_p50_ms']:.2f} ms per user "
        f"(p99 {hundred['per_user_p99_ms']:.2f} ms)" if hundred else None,
        hundred["per_user_p50_ms"] <= BATCH_USER_MS if hundred else None)
    big = inprocess.get(MILLION)
    add(f"1M items one user in-process: handler p50 <= {MILLION_USER_MS:g} ms",
        f"{_pp(big['handler_ms'])} ms (p50 / p99); {_retrievers(big)}" if big else None,
        big["handler_ms"]["p50"] <= MILLION_USER_MS if big else None)

    seq = _load(r.get("host"), 1)
    served = inprocess.get(r["host"]["model"]) if seq else None
    if seq and served:
        p50, base = seq["latency_ms"]["p50"], served["handler_ms"]["p50"]
        add("ML-1M one user: p50 through MMS <= in-process p50 + 1 ms",
            f"{r['host']['model']}: {p50:.2f} ms vs {base:.2f} ms in-process ({p50 - base:+.2f} ms)", p50 <= base + 1)
    else:
        add("ML-1M one user: p50 through MMS <= in-process p50 + 1 ms", None, None)
    c8 = [(where, _load(r.get(where), 8)) for where in ("host", "container")]
    c8 = [(w, load) for w, load in c8 if load]
    add(">= 400 req/s at concurrency 8",
        ", ".join(f"{w} {load['rps']:.0f} req/s" for w, load in c8) or None,
        all(load["rps"] >= 400 for _, load in c8) if c8 else None)
    starts = [(w, r[w]["cold_start_s"]) for w in ("host", "container") if r.get(w, {}).get("cold_start_s")]
    add("cold start <= 10 s (serve start to first good /invocations)",
        ", ".join(f"{w} {s:.1f} s" for w, s in starts) or None, all(s <= 10 for _, s in starts) if starts else None)
    growth = r.get("memory", {}).get(MILLION, {}).get("growth_per_worker_mb")
    add("1M x 64: total PSS grows < 50 MB per added worker",
        f"{growth:.1f} MB per worker (1 -> 4 workers)" if growth is not None else None,
        growth < 50 if growth is not None else None)
    ann = r.get("ann")
    name = "1M items: approximate top-100 p50 <= 2 ms at recall@100 >= 0.95 (IVF retriever alone)"
    if ann:
        approx, recall = ann["ann_ms"]["p50"], ann["ann"]["recall_at_100"]
        add(name, f"{approx:.2f} ms at recall@100 {recall:.3f}", approx <= 2 and recall >= 0.95)
    else:
        add(name, None, None)
    for target in (*_fresh_history_targets(r.get("fresh_history")), *_event_write_targets(r.get("event_writes")),
                   *serving_scale.verdicts(r.get("serving_scale", {}).get("cells", []))):
        add(*target)
    return out


Verdict = tuple[str, str | None, bool | None]  # target, what was measured (None: not measured), met


def _fresh_history_targets(f: dict[str, Any] | None) -> list[Verdict]:
    """Issue 11's serving targets from :func:`bench.fresh_history.measure`'s result."""
    open_s = f["settings"]["breaker_open_s"] if f else 1.0
    names = [
        f"User-history read in the container, one user: added p50 <= {HISTORY_ADDED_MS:g} ms (with vs without "
        "the group)",
        "User-history read, batch of 100 users: one BatchGetRecord call per invocation",
        "An event recorded with `python -m training events put` changes the very next answer",
        *(f"Feature Store {label}: p50 <= {OPEN_TO_HEALTHY:g}x the healthy p50 once the breaker is open"
          for label in OUTAGES.values()),
        f"Recovery on the first probe after the store returns (breaker open period {open_s:g} s)",
    ]
    if not f:
        return [(name, None, None) for name in names]
    single, batch = f["latency"]["single"], f["latency"]["batch"]
    added = single["with"]["latency_ms"]["p50"] - single["without"]["latency_ms"]["p50"]
    calls = f["calls"]["batch"]
    rounds = f["freshness"]
    first = [x for x in rounds if x["requests"] == 1]
    after_ms = sorted(x["ms_after_return"] for x in first)
    verdicts: list[Verdict] = [
        (names[0], f"{_versus(single)} ({added:+.2f} ms; the worker's history stage "
                   f"{_history_p50(single['with'])} vs {_history_p50(single['without'])} ms)",
         added <= HISTORY_ADDED_MS),
        (names[1], f"{calls['batch_get_record']} calls for {calls['invocations']} batch invocations; "
                   f"{_versus(batch)}", calls["batch_get_record"] == calls["invocations"]),
        (names[2], f"{len(first)} of {len(rounds)} rounds on the first request ({len(rounds) - len(first)} needed "
                   f"more); that answer {_f(after_ms[len(after_ms) // 2] if after_ms else None)} ms (median) after "
                   "the command returned", len(first) == len(rounds)),
    ]
    for kind, name in zip(OUTAGES, names[3:5]):
        x = f["outages"].get(kind)
        if not x or not x["open"]["latency_ms"]:
            verdicts.append((name, None, None))
            continue
        ratio = x["open"]["latency_ms"]["p50"] / x["healthy"]["latency_ms"]["p50"]
        verdicts.append((name, f"{_pp(x['open']['latency_ms'])} ms open vs {_pp(x['healthy']['latency_ms'])} ms "
                               f"healthy (p50 / p99; {ratio:.2f}x)", ratio <= OPEN_TO_HEALTHY))
    recoveries = {kind: x["recovery"] for kind, x in f["outages"].items()}
    verdicts.append((names[5], "; ".join(f"{kind}: {_recovery(x)}" for kind, x in recoveries.items()) or None,
                     all(_first_probes_closed(x) for x in recoveries.values()) if recoveries else None))
    return verdicts


def _event_write_targets(e: dict[str, Any] | None) -> list[Verdict]:
    """The event-recording targets from :func:`bench.event_writes.measure`'s result."""
    lost_name = "1,000 events/s for 10,000 users by 8 concurrent writers: 0 lost (counted back)"
    rate_name = (f"1,000 events/s recorded for 10,000 users by 8 concurrent writers (>= {EVENT_RATE_SHARE:.0%} of the "
                 "offered rate achieved)")
    if not e:
        return [(lost_name, None, None), (rate_name, None, None)]
    setup, recorded, counted = e["setup"], e["recorded"], e["counted"]
    offered = (f"{setup['offered_rate']:,} events/s offered for {setup['seconds']} s, {setup['users']:,} users, "
               f"{setup['writers']} writers")
    cpu = e.get("cpu")
    capacity = (f"; CPU {cpu['total_ms']:.2f} ms per event (writers + server): {cpu['cores']} idle cores would "
                f"sustain about {cpu['sustainable_rate']:,} events/s" if cpu else "")
    return [
        (lost_name, f"{counted['found']:,} of {counted['offered']:,} counted back, {counted['lost']} lost, "
                    f"{recorded['failed_users']} users failed ({offered})",
         counted["lost"] == 0 and recorded["failed_users"] == 0),
        (rate_name, f"{recorded['achieved_rate']:,} events/s ({recorded['stored']:,} events in "
                    f"{recorded['elapsed_s']} s){capacity}",
         recorded["achieved_rate"] >= EVENT_RATE_SHARE * setup["offered_rate"]),
    ]


def _versus(pair: dict[str, Any]) -> str:
    """``with ... vs without ... ms (p50 / p99)`` of a with/without-the-group pair of load summaries."""
    return f"{_pp(pair['with']['latency_ms'])} ms with vs {_pp(pair['without']['latency_ms'])} ms without (p50 / p99)"


def _history_p50(load: dict[str, Any]) -> str:
    """The p50 of a load summary's history stage (the worker's own ``timings_ms.history``)."""
    return _f(load["history_ms"]["p50"] if load.get("history_ms") else None)


def _recovery(x: dict[str, Any]) -> str:
    if x["seconds"] is None:
        return "no answer without degradation"
    closed = x["first_probe_closed"]
    probes = f"{sum(v is True for v in closed.values())} of {len(closed)} workers closed on their first probe"
    return f"first good answer {x['seconds']:.2f} s ({x['requests']} requests) after it was back, {probes}"


def _first_probes_closed(x: dict[str, Any]) -> bool:
    """Every worker whose probe was seen closed its breaker on the first one (and one at least was)."""
    seen = [v for v in x["first_probe_closed"].values() if v is not None]
    return x["seconds"] is not None and bool(seen) and all(seen)



def markdown(r: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    m = r["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{r['command']}` on {r['started_at']} in {r['duration_s']:.0f} s. Raw figures: `{r['json']}`.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {m['cpu']}, {m['cores']} cores |",
        f"| RAM | {m['ram_gib']} GiB |",
        f"| load average (1/5/15 min) | {_triple(r['load_before'])} before, {_triple(r['load_after'])} after |",
        f"| commit | `{m['commit']}`{' + uncommitted changes' if m['dirty'] else ''} |",
        f"| software | Python {m['python']}, numpy {m['numpy']}, xgboost {m['xgboost']}, "
        f"OMP_NUM_THREADS={m['omp_num_threads']} |",
        "",
        "Timings on a shared 2-core machine are noisy: read medians, tails and the ratios measured in the "
        "same run, not single numbers. All latencies are in milliseconds.",
        "",
        "## Targets",
        "",
        *_table(["target", "measured", "met"],
                [[t["target"], t["measured"], {True: "met", False: "**not met**", None: MISSING}[t["met"]]]
                 for t in r["targets"]]),
    ]
    if r.get("inprocess"):
        stages = [s for s in next(iter(r["inprocess"].values()))["stages_ms"] if s != "total"]
        lines += ["", "## In-process latency per stage (p50 / p99)", "",
                  "The handler called in this process (`predict_fn` + `output_fn`: JSON in, recommend, JSON out), "
                  "one random user per request, embedded feature source. Stage times are the recommender's own: "
                  "*history* gathers the user's recent items, *retrieval* runs every candidate source and merges "
                  "their lists, *recommend* is the sum of the stages.", ""]
        lines += _table(
            ["model", "items", "users", "requests", *stages, "recommend", "handler"],
            [[name, f"{x['n_items']:,}", f"{x['n_users']:,}", x["requests"],
              *(_pp(x["stages_ms"][s]) for s in (*stages, "total")), _pp(x["handler_ms"])]
             for name, x in r["inprocess"].items()],
        )
        lines += ["", "Dense candidate retrieval: an IVF index serves from `ANN_MIN_ITEMS` items on, when the "
                  "recall@100 measured at packaging reaches `ANN_MIN_RECALL`; otherwise every item is scored.", ""]
        lines += [f"- {name} ({', '.join(x.get('sources', [])) or 'sources not recorded'}): {_retrievers(x)}"
                  for name, x in r["inprocess"].items()]
    served = [(w, r[w]) for w in ("host", "container") if r.get(w) and "loads" in r[w]]
    if served:
        lines += ["", "## End-to-end `/invocations` through multi-model-server", "",
                  "Each client thread holds one keep-alive connection. *Recommend in the worker* is the answer's "
                  "own `timings_ms.total`. *Overhead* is the client's p50 minus the in-process handler p50 of the "
                  "same model in this run; *ratio* is the client's p50 over that in-process p50.", ""]
        rows = []
        for where, s in served:
            for load in s["loads"]:
                rows.append([where, s["model"], s["workers"], load["concurrency"], load["requests"], load["errors"],
                             f"{load['rps']:.0f}", _pp(load["latency_ms"]), _pp(load["handler_ms"]),
                             _f(load.get("overhead_ms")), _f(load.get("ratio_to_inprocess"), "x")])
        lines += _table(["server", "model", "workers", "concurrency", "requests", "errors", "req/s", "p50 / p99",
                         "recommend in the worker", "overhead p50", "ratio"], rows)
        lines += ["", "Cold start (`serve` process start, or `docker run`, to the first good `/invocations`): "
                  + ", ".join(f"{w} {s['cold_start_s']:.1f} s" for w, s in served) + "."]
    if r.get("batch"):
        b = r["batch"]
        lines += ["", f"## Batch requests: per-user cost ({b.get('model', '?')})", "",
                  "`{\"instances\": [...]}` with N users, sequential; per-user cost is the request's p50 (and p99) "
                  "over N.", ""]
        rows = []
        for size, x in b["inprocess"].items():
            single = b["inprocess"]["1"]["per_user_p50_ms"]
            row = [size, x["requests"], _pair(x["per_user_p50_ms"], x.get("per_user_p99_ms")),
                   _f(x["per_user_p50_ms"] / single, "x")]
            host = b.get("host", {}).get(size)
            if host:
                host_single = b["host"]["1"]["per_user_p50_ms"]
                row += [_f(host["per_user_p50_ms"]), _f(host["per_user_p50_ms"] / host_single, "x")]
            rows.append(row + [MISSING] * (6 - len(row)))
        lines += _table(["users per request", "requests", "in-process per user", "vs single",
                         "host MMS per user", "vs single"], rows)
    if r.get("sequence_encoder"):
        lines += _sequence_encoder(r["sequence_encoder"])
    if r.get("ann"):
        a = r["ann"]
        lines += ["", f"## 1M items: exact vs IVF index ({a['n_items']:,} x {a['dim']}, `python -m training.ann_index`)", "",
                  "| retrieval (100 unseen candidates, one user) | p50 | p99 |", "|---|---|---|"]
        for label, key in (("exact, seen masked", "exact_ms"), ("IVF", "ann_ms"),
                           ("IVF, filter keeping 1/3", "ann_filter_third_ms"), ("IVF, filter keeping 1%", "ann_filter_1pct_ms")):
            lines.append(f"| {label} | {a[key]['p50']:.2f} | {a[key]['p99']:.2f} |")
        lines += ["", f"recall@100 {a['ann']['recall_at_100']:.3f} (1/3 filter: {a['recall_filter_third']:.3f}); "
                  f"index {a['index_mib']} MiB next to {a['item_factors_mib']} MiB of item factors; "
                  f"peak RSS {a['peak_rss_mib']} MiB."]
    if r.get("feature_sources"):
        f = r["feature_sources"]
        lines += ["", f"## Feature sources (in-process, {f['model']}, the same users)", "",
                  f"The local Feature Store server speaks the real wire protocol over loopback (ingest of every item: "
                  f"{f['ingest_s']} s). `degraded` counts answers that fell back to the snapshot.", ""]
        lines += _table(
            ["source", "requests", "features", "recommend", "handler", "degraded", "cache hit rate"],
            [[k, x["requests"], _pp(x["stages_ms"]["features"]), _pp(x["stages_ms"]["total"]), _pp(x["handler_ms"]),
              x["degraded"], _f(x.get("cache_hit_rate"))]
             for k, x in f.items() if isinstance(x, dict)],
        )
    if r.get("memory"):
        lines += ["", "## Memory: PSS with 1, 2 and 4 workers", "",
                  "psutil `memory_full_info().pss` summed over `serve`, Java, the Python process that preloads the "
                  "model and the workers it forks (the `worker` column sums them), after concurrent requests reached "
                  "every worker. Arrays are memory-mapped, so their pages are shared.", ""]
        rows = []
        for model, x in r["memory"].items():
            for run in x["runs"]:
                roles = {r: sum(p["pss_mb"] for p in run["processes"] if p["role"] == r) for r in ROLES}
                rows.append([model, run["workers"], f"{run['cold_start_s']:.1f}", f"{run['total_mb']:.0f}",
                             *(f"{roles[r]:.0f}" for r in ROLES), f"{run['per_worker_mb']:.0f}"])
        lines += _table(["model", "workers", "cold start s", "total MB", *ROLES, "per worker"], rows)
        lines += [""] + [f"- {model}: total PSS grows {x['growth_per_worker_mb']:.1f} MB per added worker (1 -> 4)."
                         for model, x in r["memory"].items()]
    if r.get("fresh_history"):
        lines += _fresh_history(r["fresh_history"])
    if r.get("event_writes"):
        lines += _event_writes(r["event_writes"])
    if r.get("serving_scale"):
        lines += serving_scale_section(r["serving_scale"], r["command"])
    if r.get("notes"):
        lines += ["", "## Notes", "", *[f"- {note}" for note in r["notes"]]]
    return "\n".join(lines) + "\n"


def serving_scale_section(s: dict[str, Any], command: str) -> list[str]:
    """The serving-scale section: :func:`bench.serving_scale.measure_grid`'s cells as two tables
    (size and cold start; memory and latency) and the per-user / per-item fits."""
    cells = s["cells"]
    workers = s.get("workers", [1, 2, 4])
    lines = ["", "## Serving at scale: catalog size x user count", "",
             f"`{command}`. Synthetic models in the Amazon shape: each user has a few interactions "
             f"(geometric, {s['history_mean']:g} on average, all in the history), popularity-skewed items; the rest "
             "as in the other synthetic models (MF, item neighbours and sequence encoder, the full ranker; IVF "
             "indexes from `ANN_MIN_ITEMS` items). *Fresh process*: `python -m bench.serving_scale MODEL_DIR` "
             "from its start to the first recommendation (import, `TwoStageRecommender.from_model_dir`, "
             "first answer; *CPU* is that process's CPU time by then, what an idle core would take), then "
             f"{s['requests']} single-user requests for random known users through the handler (id lookups "
             "included). *serve*: `container/serve` on this host, process start to the first good "
             "`/invocations` (sha256 of every file, load, warm-up, multi-model-server and its preload; *CPU* sums "
             "every process of the tree), then the same requests for every worker count at concurrency 8 and PSS "
             "summed over every process (`serve`, Java, the preload process, the workers), split into anonymous "
             "memory and mapped files (`/proc/PID/smaps_rollup`). The artifact is in the page cache.", ""]
    rows = []
    for c in cells:
        d, p = c["disk"], c.get("probe")
        runs = {r["workers"]: r for r in c.get("served", {}).get("runs", [])}
        one = runs.get(1)
        rows.append([c["name"], f"{c['interactions']:,}", f"{d['total_bytes'] / 2**20:,.0f}",
                     f"{d['bytes_per_user']:.0f}", f"{d['bytes_per_item']:.0f}",
                     f"{p['first_answer_s']:.2f} / {p['first_answer_cpu_s']:.2f}"
                     if p and "first_answer_cpu_s" in p else f"{p['first_answer_s']:.2f}" if p else MISSING,
                     f"{p['import_s']:.2f} / {p['load_s']:.2f} / {p['first_s']:.2f}" if p else MISSING,
                     (f"{one['cold_start_s']:.1f} / {one['cold_start_cpu_s']:.1f}" if "cold_start_cpu_s" in one
                      else f"{one['cold_start_s']:.1f}") if one else MISSING])
    lines += _table(["cell", "interactions", "disk MB", "bytes per user", "bytes per item",
                     "fresh process to first answer s (wall / CPU)", "import / load / first answer s",
                     "serve cold start s (wall / CPU)"], rows)
    lines += [""]
    rows = []
    for c in cells:
        p = c.get("probe")
        served = c.get("served", {})
        runs = {r["workers"]: r for r in served.get("runs", [])}
        rows.append([c["name"],
                     *(f"{runs[w]['total_mb']:.0f}" + (f" ({runs[w]['anon_mb']:.0f} + {runs[w]['file_mb']:.0f})"
                                                        if "anon_mb" in runs[w] else "")
                       if w in runs else MISSING for w in workers),
                     _f(served.get("added_per_worker_mb")), _f(served.get("added_anon_per_worker_mb")),
                     _pp(p["handler_ms"]) if p else MISSING,
                     f"{serving_scale.p50_budget_ms(c['n_items']):g}",
                     _triple(p["load_avg"]) if p and "load_avg" in p else MISSING])
    lines += _table(["cell", *(f"serve PSS {w} worker{'s' if w > 1 else ''} MB (anon + file)" for w in workers),
                     f"added per worker MB ({workers[0]} -> {workers[-1]})", "of which anonymous MB",
                     "handler p50 / p99 ms", "p50 budget ms", "load average"], rows)
    if s.get("interleaved"):
        lines += ["", "Handler latency against the user count, each catalog's models loaded in one process and asked in "
                  "turn (one request to each, random known users), so a drifting machine load weighs on all alike:", ""]
        rows = []
        for x in s["interleaved"]:
            p50 = [h["p50"] for h in x["handler_ms"]]
            rows.append([count_label(x["n_items"]) + " items",
                         "; ".join(f"{count_label(u)} users {_pp(h)}" for u, h in zip(x["n_users"], x["handler_ms"])),
                         f"{p50[-1] / p50[0]:.2f}x", _triple(x["load_avg"])])
        lines += _table(["catalog", "handler p50 / p99 ms per user count", "p50 most / fewest users",
                         "load average"], rows)
    fits = s.get("fits") or {}
    disk, pss = fits.get("disk_bytes"), fits.get("serve_1_worker_pss_mb")
    notes = []
    if disk:
        notes.append(f"disk ~ {disk['base'] / 2**20:.0f} MB + {disk['per_user']:.0f} bytes per user + "
                     f"{disk['per_item']:.0f} bytes per item")
    if pss:
        notes.append(f"serve PSS with 1 worker ~ {pss['base']:.0f} MB + {pss['per_user'] * 1e6:.1f} MB per million "
                     f"users + {pss['per_item'] * 1e6:.1f} MB per million items")
    if notes:
        lines += ["", "Least-squares fits over the grid: " + "; ".join(notes) + "."]
    lines += ["", "Issue 13's targets in this run:", ""]
    lines += [f"- {name}: {measured or 'not measured'} ({_VERDICT[met]})"
              for name, measured, met in serving_scale.verdicts(cells)]
    return lines


def _fresh_history(f: dict[str, Any]) -> list[str]:
    """The fresh-history section: :func:`bench.fresh_history.measure`'s latency, freshness and outage tables."""
    s = f["settings"]
    lines = ["", f"## Fresh history: the user-history group through the container ({f['model']})", "",
             f"`docker run IMAGE serve` ({f['workers']} workers, host networking) reads each request's users from the "
             "local Feature Store server on this host (a subprocess; the group seeded with the training histories of "
             f"{f['n_users']:,} users in {f['seed_s']} s) when `USER_HISTORY_FEATURE_GROUP_NAME` is set. Item "
             "features come from the model's snapshot, so the history read is the only Feature Store call. One "
             f"client, one request at a time. `FEATURE_STORE_DEADLINE_MS={s['deadline_ms']:g}`; the breaker opens "
             f"after {s['breaker_failures']} failed reads for `FEATURE_STORE_BREAKER_OPEN_S={s['breaker_open_s']:g}` "
             "(the default is 5 s: shorter here, so recovery takes seconds). Containers with and without the group "
             "ran in the order with, without, without, with, the same bodies pooled per setting, so a load that "
             "drifts weighs on both alike.", ""]
    rows = []
    for kind, label in (("single", "one user"), ("batch", f"batch of {s['batch']} users")):
        pair, calls = f["latency"][kind], f["calls"][kind]
        added = pair["with"]["latency_ms"]["p50"] - pair["without"]["latency_ms"]["p50"]
        rows.append([label, pair["with"]["requests"], _pp(pair["without"]["latency_ms"]),
                     _pp(pair["with"]["latency_ms"]), f"{added:+.2f}", _pp(pair["without"]["history_ms"]),
                     _pp(pair["with"]["history_ms"]), f"{calls['batch_get_record']} / {calls['invocations']}",
                     pair["with"]["degraded"]])
    lines += _table(["request", "requests", "without the group", "with the group", "added p50",
                     "history stage without", "history stage with", "BatchGetRecord calls / invocations",
                     "degraded"], rows)
    lines += ["", "p50 / p99 as the client saw them; the *history stage* is the worker's own `timings_ms.history` "
              "(with the group: the Feature Store read). Calls are counted by the local server's `/_admin/stats`.",
              "", "**Freshness.** For each user, their top recommendation was recorded with "
              "`python -m training events put --feature-group G --user-id U --item-id I --region us-east-1 "
              "--endpoint-url URL` (a subprocess, dummy credentials), then the same request was sent until the item "
              "was gone from the answer.", ""]
    lines += _table(["user", "item recorded", "command s", "requests until the item was gone",
                     "ms from the command's return to that answer", "degraded"],
                    [[x["user_id"], x["item_id"], f"{x['command_s']:.2f}",
                      MISSING if x["requests"] is None else x["requests"], _f(x["ms_after_return"]), x["degraded"]]
                     for x in f["freshness"]])
    lines += ["", f"**Feature Store down.** Requests back to back while the store is healthy, then while it refuses "
              f"connections (the server killed) or hangs ({s['hang_ms']:g} ms added to every call), until every "
              "worker's breaker has opened (read from the container's log), then as many with the breakers open "
              "(probes included: one per worker per open period, each waiting up to the deadline), then with the "
              "store back (restarted on its port, or the fault cleared) until every worker closed its breaker. "
              "*First probe closed* is per worker, from the breaker's log lines.", ""]
    rows = []
    for kind, x in f["outages"].items():
        rec, opened = x["recovery"], x["open"]
        ratio = (opened["latency_ms"]["p50"] / x["healthy"]["latency_ms"]["p50"]) if opened["latency_ms"] else None
        closed = rec["first_probe_closed"]
        rows.append([kind, _pp(x["healthy"]["latency_ms"]), _pp(opened["latency_ms"]), _f(ratio, "x"),
                     f"{opened['requests']} ({opened['probes']} probes, {opened['degraded']} degraded)",
                     f"{x['trip']['requests']} in {x['trip']['seconds']:.2f} s ({x['trip']['workers_opened']} workers)",
                     _recovered(rec["requests"], rec["seconds"]),
                     _recovered(rec["last_degraded_request"], rec["last_degraded_s"]),
                     f"{sum(v is True for v in closed.values())} of {len(closed)}"])
    lines += _table(["store", "healthy p50 / p99", "breaker open p50 / p99", "open / healthy p50",
                     "requests while open", "requests until every breaker opened", "first good answer after return",
                     "last degraded answer after return", "first probe closed"], rows)
    return lines


def _recovered(requests: int | None, seconds: float | None) -> str:
    return MISSING if requests is None or seconds is None else f"request {requests}, {seconds:.2f} s"


def _event_writes(e: dict[str, Any]) -> list[str]:
    """The event-recording section: ``python -m local_test.feature_store.events_bench``'s figures."""
    setup, recorded, counted = e["setup"], e["recorded"], e["counted"]
    lines = ["", "## Recording events into the user-history group", "",
             f"`{e['command']}` (exit status {e['exit_status']}): {setup['writers']} writer processes offer "
             f"{setup['offered_rate']:,} events/s for {setup['seconds']} s, each for a random one of "
             f"{setup['users']:,} users, against the local Feature Store, with the compare-and-set of "
             "`python -m training events put`; every event is then counted back.", "",
             "| figure | value |", "|---|---|",
             f"| events recorded | {recorded['stored']:,} of {recorded['offered']:,} in {recorded['elapsed_s']} s: "
             f"{recorded['achieved_rate']:,} events/s |",
             f"| counted back | {counted['found']:,} of {counted['offered']:,}; lost {counted['lost']} |",
             f"| puts; lost versions merged and retried; users failed | {recorded['puts']:,}; "
             f"{recorded['conflicts']:,}; {recorded['failed_users']} |",
             f"| event latency, offer to confirmed write (p50 / p99 ms) | {_pp(e['event_latency'])} |",
             f"| merge-write call, {e['merge_write']['events_per_call']} events each (p50 / p99 ms) | "
             f"{_pp(e['merge_write'])} |"]
    if e.get("cpu"):
        c = e["cpu"]
        lines.append(f"| CPU per event: writers + server | {c['writer_ms']:.2f} + {c['server_ms']:.2f} = "
                     f"{c['total_ms']:.2f} ms ({c['cores']} idle cores would sustain about "
                     f"{c['sustainable_rate']:,} events/s) |")
    lines += [f"| `FeatureStoreHistorySource.get`, 1 user (p50 / p99 ms) | {_pp(e['read_1'])} |",
              f"| `FeatureStoreHistorySource.get`, 100 users (p50 / p99 ms) | {_pp(e['read_100'])} |"]
    return lines


def _sequence_encoder(e: dict[str, Any]) -> list[str]:
    """The ONNX Runtime vs PyTorch table of ``python -m bench.sequence_encoder``."""
    lines = ["", "## Sequence encoder: ONNX Runtime vs PyTorch (`python -m bench.sequence_encoder`)", "",
             f"A SASRec-shaped encoder ({e['n_items']:,} items, dim {e['dim']}, {e['n_blocks']} blocks, "
             f"{e['n_heads']} head(s), {e['max_length']} slots) with random weights, exported with `torch.onnx` "
             f"as training exports it. `onnxruntime` is the serving encoder (ONNX Runtime "
             f"{e['onnxruntime_version']} on one intra-op thread, as a model-server worker has one core, and the "
             f"item lookup in numpy); `torch` is PyTorch {e['torch_version']} on one thread, for reference (the "
             f"image has no torch). Histories of 5-199 items, the last {e['max_length']} read; {e['repeats']} "
             f"timed calls for one user, {e.get('batch_repeats', e['repeats'])} for a batch.", ""]
    rows = []
    for runtime in e["one_user_ms"]:
        one, batch = e["one_user_ms"][runtime], e["batch_ms"][runtime]
        rows.append([runtime, _pp(one), _pp(batch), _f(batch["p50"] / e["batch"]),
                     f"{e['max_abs_diff_vs_torch'][runtime]:.1e}"])
    lines += _table(["runtime", "one user", f"batch of {e['batch']}", "per user in the batch (p50)",
                     "max abs diff vs PyTorch"], rows)
    ratio = [e[k]["onnxruntime"]["p50"] / e[k]["torch"]["p50"] for k in ("one_user_ms", "batch_ms")]
    return lines + ["", f"ONNX Runtime's p50 over PyTorch's: {ratio[0]:.2f}x for one user, "
                        f"{ratio[1]:.2f}x for a batch of {e['batch']}."]


def _retrievers(x: dict[str, Any]) -> str:
    """Which retriever each dense source of an in-process run used, and why."""
    parts = []
    for source, y in x.get("retrievers", {}).items():
        index = y.get("index")
        if y["retriever"] == "ivf":
            parts.append(f"{source} IVF ({index['n_probe']} of {index['n_lists']} cells, "
                         f"recall@100 {index['recall_at_100']:.3f} at packaging)")
        elif index:
            parts.append(f"{source} exact (its index reached recall@100 {index['recall_at_100']:.3f} at packaging, "
                         f"below ANN_MIN_RECALL {y['ann_min_recall']:g})"
                         if index["recall_at_100"] < y["ann_min_recall"] else f"{source} exact (ANN_MIN_ITEMS)")
        else:
            parts.append(f"{source} exact (no index)")
    return ", ".join(parts) or "no dense source"


def _load(section: dict[str, Any] | None, concurrency: int) -> dict[str, Any] | None:
    if not section:
        return None
    return next((x for x in section.get("loads", []) if x["concurrency"] == concurrency), None)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows
    ]


def _pp(summary: dict[str, float] | None) -> str:
    return MISSING if summary is None else f"{summary['p50']:.2f} / {summary['p99']:.2f}"


def _pair(p50: float, p99: float | None) -> str:
    return _f(p50) if p99 is None else f"{p50:.2f} / {p99:.2f}"


def _f(value: float | None, suffix: str = "") -> str:
    return MISSING if value is None else f"{value:.2f}{suffix}"


def _triple(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)
