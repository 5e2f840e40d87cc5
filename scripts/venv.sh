# Sourced by scripts/test, scripts/demo and scripts/bench: makes .venv and installs the project into it.
# The venv is made from /usr/bin/python3 when present: a Python living under /root cannot run as another user,
# and the tests run worker programs as a non-root user.
ensure_venv() {
    local extras="${1:-}"
    local py=python3
    [ -x /usr/bin/python3 ] && py=/usr/bin/python3
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv with $py" >&2
        "$py" -m venv .venv
    fi
    local stamp=".venv/.installed-${extras:-base}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "installing the project into .venv${extras:+ (with $extras extras)}" >&2
        .venv/bin/python -m pip install --quiet --upgrade pip
        if [ -n "$extras" ]; then
            .venv/bin/python -m pip install --quiet -e ".[$extras]"
        else
            .venv/bin/python -m pip install --quiet -e .
        fi
        touch "$stamp"
    fi
}
