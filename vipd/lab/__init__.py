"""The proving ground: a three-node lab in network namespaces on one Linux machine.

Owns: building and tearing down the lab network (``net``), the real etcd it elects with
(``etcd``), the HTTPS apiserver stand-ins (``apiserver``), the daemons under test (vipd or
keepalived, ``daemons``), the observers (``watch``: the VIP holder watcher process;
``observe``: its reader and the client probe), the
failover bounds (``bounds``), the demo story (``story``) and ``vipd lab`` (``cli``).

Must never: add an address, route or link in the root network namespace, send traffic to
anything outside the lab's own namespaces, or leave anything behind when it exits.
The lab is a blocking orchestration tool (subprocesses, observer threads, wall-clock
measurements); the daemon's own rule "time comes from trio" does not apply here.
"""
