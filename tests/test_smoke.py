from usage_guard import Plan


def test_consume_counts(make_guard):
    guard = make_guard(plans={"free": Plan("free", {"emails": 2})}, default_plan="free")
    assert guard.consume("acme", "emails").allowed
    assert guard.consume("acme", "emails").allowed
    denied = guard.consume("acme", "emails")
    assert not denied.allowed and denied.used == 2
