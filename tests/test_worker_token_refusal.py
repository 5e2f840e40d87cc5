"""A refused CAPE_TOKEN in a worker operator's words, naming the token by its id, never by its secret."""
from __future__ import annotations

from services.worker.api_errors import NEW_TOKEN, token_refusal


def test_a_refusal_names_the_token_by_its_id_and_never_quotes_a_secret():
    assert token_refusal("revoked_token", "people's advice", "abc123,c2VjcmV0") == f"token abc123 was revoked; {NEW_TOKEN}"
    # Pasted without its id (or in another shape): nothing of it is quoted.
    said = token_refusal("bad_token", "people's advice", "c2VjcmV0LXNlY3JldA==")
    assert said.startswith("the token is not one it knows") and "c2VjcmV0" not in said
    assert "c2Vj" not in token_refusal("bad_token", "x", "a b c,c2VjcmV0")  # an odd "id" is not quoted either
    secret = "q8wLlYdTq3JpZ8cC0rKx6uSEsqfHk1xj3uQvRk3u0dM="  # a real secret's shape: 32 bytes, urlsafe base64
    for reversed_token in (f"{secret},0123456789abcdef0123456789abcdef", f"{secret[:-1]},0123"):
        assert "q8wL" not in token_refusal("bad_token", "x", reversed_token)
    assert token_refusal("bad_token", "x", "0123456789abcdef0123456789abcdef," + secret).startswith(
        "token 0123456789abcdef0123456789abcdef is not one it knows")
    assert token_refusal("no_token", "x", "") == ("no token reached it (check CAPE_TOKEN, and any proxy on the way); "
                                                  f"{NEW_TOKEN}")
    assert token_refusal("other", "the server's words", "a,b") == f"the server's words; {NEW_TOKEN}"
