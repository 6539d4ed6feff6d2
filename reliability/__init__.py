"""The reliability workload (issue 15): load, faults and a checker, run from the checkout.

    python -m reliability.run --minutes 10 [--clients 3] [--seed 0] [--faults shard,sigstop,slowdisk,reshard,frontend,server]
                              [--report docs/RELIABILITY.md]

Not part of the wheel (pyproject.toml lists the packages it ships; like ``bench/``, this folder is a
development tool). One topic per module:

- ``processes``: sessions and their processes, found in /proc; SIGKILL by session; the shard
  actors' worker processes (``ray::Shard``) and the shard each serves; a process started with its
  output pumped to a log file until a line says it is up.
- ``deployment``: the deployment under test on 127.0.0.1: a Ray head and two ``monim serve`` front
  ends of one deployment on one data dir, each in its own session; kill, restart, stop.
- ``reaper``: a watchdog process that kills those sessions if the driver dies or overruns.
- ``compare``: a served answer against the model's (neighbours with ties, rows).
- ``twin``: a client's exact model of its namespaces (the in-process store fed the acknowledged
  calls) and the map between its ids and the served ones.
- ``workload``: one client process: a random mix of calls, each read checked against the model at
  once, every write retried with its request id until acknowledged, failing over between front ends.
- ``faults``: the fault schedule, the faults and their recovery times.
- ``verify``: the final state of every namespace against the models.
- ``report``: the tables (rich), and the section of docs/RELIABILITY.md.
- ``run``: the command: start, load, faults, stop, check, report; its exit code.
"""
