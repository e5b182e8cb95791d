"""How the commands print: tables, short peer ids, the error line, and the client's views."""

from __future__ import annotations

import sys
import time
from typing import Any

from vcoind.train.cli import fmt_training

EXIT_USAGE = 2


def die(msg: str, code: int = 1) -> int:
    print(f"vcoind: error: {msg}", file=sys.stderr)
    return code


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def short_id(pid: str) -> str:
    return pid if len(pid) <= 16 else f"{pid[:8]}…{pid[-6:]}"


def fmt_node_info(r: dict[str, Any]) -> str:
    dev = r.get("device") or {}
    lines = [
        f"peer id      {r['peer_id']}",
        f"eth address  {r['eth_address']}",
        f"network      {r['network']}   version {r['version']}",
        f"rpc          {r['rpc_url']}",
        *[f"p2p          {a}" for a in r["p2p_addrs"]],
        f"uptime       {r['uptime_s']:.0f} s   peers {r['peer_count']}   "
        f"connections {r['connections']}   heartbeat every {r['heartbeat_interval']:g} s",
        f"device       {dev.get('kind', '?')} {dev.get('name', '')} "
        f"{dev.get('memory_used_mb', 0)}/{dev.get('memory_total_mb', 0)} MiB "
        f"util {dev.get('utilization', 0):.0f}%",
        f"health       {r['health']}",
    ]
    reach = r.get("reachability") or {}
    if reach:
        lines.append(
            f"reach        {reach.get('reachability', '?')} (dial-back: "
            f"{reach.get('observed', '?')})   relaying for others "
            f"{'yes' if reach.get('relay_service') else 'no'}   relay slots "
            f"{len(reach.get('reservations', []))} of {len(reach.get('relays', []))}"
        )
    dht = reach.get("dht")
    if dht:
        lines.append(f"dht          {dht['mode']}   routing table {dht['routing_table']}   "
                     f"providing {dht['provided']}   records held {dht['records']}")  # fmt: skip
    for step in r.get("progress") or []:
        lines.append(f"progress     {step['kind']} {step['label']}: "
                     f"{100 * step['fraction']:.0f}% ({step['outcome']})")  # fmt: skip
    return "\n".join(lines)


def fmt_peers(peers: list[dict[str, Any]]) -> str:
    if not peers:
        return "no peers"
    now = time.time()
    rows = [
        [
            short_id(p["peer_id"]),
            p.get("status", ""),
            "yes" if p.get("connected") else "no",
            f"{p['health']:.2f}" if p.get("health") is not None else "-",
            f"{p['latency_ms']:.1f}" if "latency_ms" in p else "-",
            f"{now - p['last_seen']:.1f}s" if p.get("last_seen") else "-",
            _fmt_stake(p.get("stake")),
            (p.get("device") or {}).get("name", "-"),
            (p.get("addrs") or ["-"])[0].split("/p2p/")[0],
        ]
        for p in peers
    ]
    head = ["PEER", "STATUS", "CONN", "HEALTH", "LAT(ms)", "SEEN", "STAKE", "DEVICE", "ADDR"]
    return fmt_table(rows, head)


def _fmt_stake(st: dict[str, Any] | None) -> str:
    """Staked VCOIN, ``*`` when below the minimum (its bids are ignored on a shared chain)."""
    if not st:
        return "-"
    return f"{st['stake']:g}" + ("" if st["eligible"] else "*")


def fmt_status(r: dict[str, Any]) -> str:
    rows = [
        [
            short_id(n["peer_id"]) + (" (self)" if n["self"] else ""),
            f"{n['health']:.2f}",
            f"{n['cpu_percent']:.0f}%",
            f"{n['memory_percent']:.0f}%",
            f"{n['device_utilization']:.0f}%",
            str(n["queue_length"]),
            f"{n['error_rate']:.3f}",
        ]
        for n in r["load_distribution"]
    ]
    lat = r["gossip"]["latency"]
    head = (
        f"network {r['network']}: {r['active_nodes']} active nodes, queue "
        f"{r['queue_length']}, average health {r['average_health']}\n"
        f"gossip latency p50 {lat.get('p50_ms', '-')} ms, p95 {lat.get('p95_ms', '-')} ms "
        f"over {lat.get('count', 0)} heartbeats; rejected {r['gossip']['rejected'] or 0}\n"
    )
    return head + fmt_table(rows, ["NODE", "HEALTH", "CPU", "MEM", "DEVICE", "QUEUE", "ERRORS"])


def fmt_violations(r: dict[str, Any]) -> str:
    lines = []
    for v in r["violations"]:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(v["created_at"]))
        lines.append(f"{when} {v['customer']} {v['kind']}: {v['measured']} vs {v['target']}, "
                     f"penalty {v['penalty']}")  # fmt: skip
    return "\n".join(lines) or "no violations"


def fmt_sla(s: dict[str, Any]) -> str:
    t = s["terms"]
    state = "compliant" if s["compliant"] else "VIOLATED: " + ", ".join(s["violations"])
    lines = [f"{s['customer']}: {state}"
             + (f" (close: {', '.join(s['breach_imminent'])})" if s["breach_imminent"] else ""),
             f"  uptime       {s['uptime_pct']:.3f} %  (terms {t['uptime_pct']} %)",
             f"  p95 latency  {s['p95_latency_s']} s  (terms {t['max_latency_s']} s)",
             f"  throughput   {s['throughput_per_day']}/day  (terms {t['min_throughput_per_day']}"
             f"/day; {s['completed']} of {s['submitted']} completed)"]  # fmt: skip
    return "\n".join(lines)


def fmt_alert(a: dict[str, Any], event: str = "") -> str:
    when = time.strftime("%H:%M:%S", time.localtime(a["resolved_at"] or a["started_at"]))
    state = event or ("ACTIVE" if a["active"] else "resolved")
    return f"{when} {state:<9} {a['severity']:<8} {a['rule']:<24} {a['message']}"


def fmt_consensus(c: dict[str, Any]) -> list[str]:
    lines = [
        f"consensus {c['decision']}  confidence {c['confidence']:.3f}  share {c['share']:.3f}  "
        f"action {c['action']}  rounds {c.get('rounds', 1)}",
    ]
    if c.get("note"):
        lines.append(f"note      {c['note']}")
    for r in c.get("replicas", []):
        mark = "agreed" if r["agreed"] else "OUTVOTED"
        answer = "  <- answer" if r["node_id"] == c.get("answer_replica") else ""
        lines.append(f"  replica {short_id(r['node_id'])}  similarity {r['similarity']:.3f}  "
                     f"weight {r['weight']:.3f}  {mark}{answer}")  # fmt: skip
    lines.append(f"signed by {len(c.get('signatures', []))} node(s); result hash "
                 f"{c['result_hash'][:16]}…")  # fmt: skip
    return lines


def fmt_payment(p: dict[str, Any]) -> str:
    if not p.get("paid"):
        return f"payment   {p.get('reason', 'unpaid')}"
    return (f"payment   ticket of {p['requester']}: up to {p['max_price_per_token']:g} "
            f"VCOIN/token x {p['max_tokens']} tokens x {p['replicas']} (at most "
            f"{p['max_cost']:g} VCOIN)")  # fmt: skip


def fmt_anchor(a: dict[str, Any]) -> str:
    line = f"anchor    {a['status']}"
    if a.get("tx_hash"):
        line += f"  tx {a['tx_hash']}  block {a.get('block')}"
    if a.get("rewards"):
        line += "  paid " + ", ".join(
            f"{r['node'][:10]}… {r['to_worker']:g}+{r['minted']:g} minted (burned {r['burned']:g})"
            for r in a["rewards"])  # fmt: skip
    if a.get("slashed"):
        line += "  slashed " + ", ".join(f"{r['node'][:10]}… {r['amount'] or 0:g} ({r['status']})"
                                         for r in a["slashed"])  # fmt: skip
    if a.get("error"):
        line += f"  ({a['error']})"
    return line


def fmt_consensus_tasks(r: dict[str, Any]) -> str:
    items = r.get("tasks", r.get("conflicts", []))
    rows = [
        [t["task_id"][:12], t["status"], str(t.get("decision") or "-"),
         f"{t['confidence']:.3f}" if t.get("confidence") is not None else "-",
         str(t.get("rounds") or "-"), t.get("why") or t.get("action") or t.get("error") or ""]
        for t in items
    ]  # fmt: skip
    if not rows:
        return "no consensus tasks"
    last = "WHY" if "conflicts" in r else "ACTION"
    head = ["TASK", "STATUS", "DECISION", "CONFIDENCE", "ROUNDS", last]
    return fmt_table(rows, head) + f"\n{len(rows)} of {r['total']}"


def fmt_task(t: dict[str, Any]) -> str:
    if t.get("type") == "lora_training":
        return fmt_training(t)
    tm = t.get("timings") or {}
    lines = [
        f"task      {t['task_id']}",
        f"status    {t['status']} ({t['phase']})   progress {t['progress']} tokens   "
        f"attempts {t['attempts']}",
        f"model     {t['model']}   node {t.get('node_id') or '-'}",
    ]
    for hop in t.get("route", []):
        err = f" ({hop['error']})" if hop.get("error") else ""
        lines.append(f"attempt {hop['attempt']}  {hop['node_id']}  {hop['status']}{err}")
    if tm:
        keys = ("assigned_s", "total_s", "prefill_s", "decode_s", "tokens_per_s", "reroutes")
        lines.append("timings   " + "  ".join(f"{k}={tm[k]}" for k in keys if k in tm))
    for h in tm.get("hops", []):
        lines.append(f"hop       {h['node_id']}  layers {h['layers']}  {h['status']}  "
                     f"compute {h['compute_s']:.3f} s  transfer {h['transfer_s']:.3f} s  "
                     f"{h['bytes']} bytes")  # fmt: skip
    if t.get("error"):
        lines.append(f"error     {t['error']}")
    pay = t.get("payment")
    if pay:
        lines.append(fmt_payment(pay))
    for b in t.get("bids", []):
        lines.append(f"bid       {short_id(b['peer_id'])}  {b['price']:g} VCOIN/token  "
                     f"eta {b['eta_s']:.3f} s  health {b['health']:.2f}")  # fmt: skip
    if t.get("consensus"):
        lines += fmt_consensus(t["consensus"])
    if t.get("anchor"):
        lines.append(fmt_anchor(t["anchor"]))
    if t.get("result") is not None:
        lines += ["", t["result"]]
    return "\n".join(lines)


def fmt_tasks(r: dict[str, Any]) -> str:
    rows = [
        [t["task_id"][:12], t["status"], t["model"], str(t["progress"]),
         short_id(t["node_id"]) if t.get("node_id") else "-", (t["input"] or "")[:40]]
        for t in r["tasks"]
    ]  # fmt: skip
    if not rows:
        return "no tasks"
    table = fmt_table(rows, ["TASK", "STATUS", "MODEL", "TOKENS", "NODE", "INPUT"])
    return table + f"\n{len(rows)} of {r['total']}"
