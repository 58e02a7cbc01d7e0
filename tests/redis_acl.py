"""The ACL rules docs/redis.md gives operators for a namespace-limited user: the namespace's keys only, every
data-type and stream command, no administrative or dangerous ones (FLUSHALL, CONFIG, KEYS, DEBUG, SHUTDOWN,
CLIENT KILL, ...). On a Redis Cluster, also what both clients need to follow the slot map. Importable from any
test: the conftest beside it puts tests/ on sys.path."""

ACL_RULES = ["on", "resetkeys", "~{ns}:*", "resetchannels", "-@all", "+@read", "+@write", "+@stream", "+@hash",
             "+@set", "+@sortedset", "+@string", "+@list", "+@transaction", "+@connection", "-@dangerous"]  # fmt: skip
CLUSTER_ACL_RULES = ["+cluster|slots", "+asking"]  # the slot map (CLUSTER SLOTS), and a migrating slot's ASK
