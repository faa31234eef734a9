#!/usr/bin/env bash
# make test-deploy: bring docker-compose.yml up on this machine and check what
# a user relies on. Images: local stand-ins for the official ones
# (deploy/local-images.sh) and bertstream built by deploy/build-image.sh.
#
#  1. the compose file refuses to start without its passwords; the gpu
#     profile carries the NVIDIA device reservation
#  2. up: redis, postgres, migrate (db upgrade, exits 0), api, worker-cpu healthy
#  3. texts through the cli service (submit --wait, stream) and through the
#     API (POST /v1/tasks with a bearer token; 401 without), rows read with
#     psql inside the postgres container
#  4. SIGKILL to the worker's host pid mid-stream is a crash: the container
#     restarts and every id ends as exactly one done row
#  5. docker kill is a manual stop: no restart. With the worker down, tasks
#     are queued, Redis restarts, the queue is intact, the worker is started
#     and processes them
#  6. --scale worker-cpu=2: two healthy workers, two heartbeats
#  7. down -v, also on failure
# Published ports are free ones picked here (the host's Redis and PostgreSQL
# keep 6379 and 5432). Exits non-zero on the first failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

say() { printf '\n== %s (%ds)\n' "$*" "$(( $(date +%s) - started ))"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(18))'; }

command -v docker-compose >/dev/null || fail "docker-compose is not installed"
docker info >/dev/null 2>&1 || fail "dockerd is not running (.ci/run starts it)"

# The shell's environment outranks the env file in docker-compose: clear what the test sets.
unset REDIS_PASSWORD POSTGRES_PASSWORD BERTSTREAM_API_TOKENS BERTSTREAM_IMAGE PYTHON_IMAGE \
  REDIS_IMAGE POSTGRES_IMAGE API_PORT REDIS_PORT POSTGRES_PORT PUBLISH_ADDR \
  BERTSTREAM_VISIBILITY_TIMEOUT_S BERTSTREAM_TORCH_THREADS
PROJECT=bertstream-deploy-test-$$
workdir=$(mktemp -d)
envfile=$workdir/env
dc() { docker-compose --project-name "$PROJECT" --env-file "$envfile" -f docker-compose.yml "$@"; }

cleanup() {
  code=$?
  if [ "$code" -ne 0 ] && [ -f "$envfile" ]; then
    echo "--- service logs (last 40 lines each) ---" >&2
    dc logs --no-color --tail 40 >&2 || true
  fi
  if [ -f "$envfile" ]; then dc --profile cli down -v --remove-orphans >/dev/null 2>&1 || true; fi
  rm -rf "$workdir"
  exit "$code"
}
trap cleanup EXIT

say "images"
mapfile -t base < <(deploy/local-images.sh)
[ "${#base[@]}" -eq 3 ] || fail "deploy/local-images.sh did not name three images"
export PYTHON_IMAGE=${base[0]}
deploy/build-image.sh bertstream:latest
docker image inspect bertstream:latest --format 'bertstream:latest {{.Size}} bytes' \
  | awk '{printf "%s %.2f GB\n", $1, $2 / 1e9}'

say "the compose file refuses to start without its secrets"
: > "$envfile"
if dc config >/dev/null 2>"$workdir/err"; then fail "config passed without REDIS_PASSWORD"; fi
grep -q "set .*_PASSWORD in .env" "$workdir/err" || fail "unexpected refusal: $(cat "$workdir/err")"
cat "$workdir/err"

TOKEN=$(secret)
API_PORT=$(free_port)
cat > "$envfile" <<ENV
REDIS_PASSWORD=$(secret)
POSTGRES_PASSWORD=$(secret)
BERTSTREAM_API_TOKENS=$TOKEN
BERTSTREAM_IMAGE=bertstream:latest
PYTHON_IMAGE=${base[0]}
REDIS_IMAGE=${base[1]}
POSTGRES_IMAGE=${base[2]}
API_PORT=$API_PORT
REDIS_PORT=$(free_port)
POSTGRES_PORT=$(free_port)
BERTSTREAM_VISIBILITY_TIMEOUT_S=60
BERTSTREAM_TORCH_THREADS=2
ENV

say "the gpu profile reserves NVIDIA devices"
dc --profile gpu config > "$workdir/gpu.yml"
awk '/^  worker-gpu:/ {on = 1; next} /^  [a-z]/ {on = 0} on' "$workdir/gpu.yml" > "$workdir/worker-gpu.yml"
grep -A5 "devices:" "$workdir/worker-gpu.yml"
grep -q 'driver: nvidia' "$workdir/worker-gpu.yml" || fail "worker-gpu reserves no NVIDIA device"
grep -Eq -- '- gpu$' "$workdir/worker-gpu.yml" || fail "worker-gpu lacks the gpu capability"
grep -Eq -- '- --gpus$' "$workdir/worker-gpu.yml" || fail "worker-gpu does not run --gpus"
dc --profile monitoring --profile cli config -q || fail "the monitoring and cli profiles do not validate"

# Polling goes through docker, not docker-compose: each docker-compose call
# costs a second of CPU that the worker under test would miss.
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1"; }
cid() { dc ps -q "$1"; }
wait_healthy() {  # container, seconds
  local deadline=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if [ "$(health "$1")" = healthy ]; then return 0; fi
    sleep 2
  done
  fail "$(docker inspect -f '{{.Name}}' "$1") not healthy after $2 s (state: $(health "$1"))"
}
psql_q() { docker exec "$postgres" psql -U bertstream -d bertstream -v ON_ERROR_STOP=1 -Atc "$1"; }
redis_q() { docker exec "$redis" redis-cli "$@"; }
queued() { echo $(( $(redis_q LLEN bertstream.bulk) + $(redis_q LLEN bertstream.interactive) )); }

say "docker-compose up -d"
dc up -d --no-build
postgres=$(cid postgres) redis=$(cid redis) worker=$(cid worker-cpu)
wait_healthy "$(cid api)" 180
wait_healthy "$worker" 300
migrate=$(dc ps -q migrate)
[ "$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$migrate")" = "exited 0" ] \
  || fail "migrate did not exit 0"
dc logs --no-color migrate | tail -3
dc ps
dc run --rm -T cli db current

say "submit through the cli service"
out=$(dc run --rm -T cli submit "这家酒店的服务很好,房间也很干净。" "The staff were rude and the room was dirty." \
      --source cli --wait --timeout 120 --format json)
python3 -c '
import json, sys
rows = json.loads(sys.argv[1])
for r in rows:
    print(r["id"], r["status"], r["label"], round(r["score"], 3), r["text"])
assert [r["label"] for r in rows] == ["positive", "negative"], rows
assert all(r["status"] == "done" for r in rows), rows
' "$out" || fail "cli submit did not give positive, negative"

say "submit through the API"
api=http://127.0.0.1:$API_PORT
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$api/v1/tasks" -H 'Content-Type: application/json' -d '{"text": "x"}')
[ "$code" = 401 ] || fail "POST without a token answered $code, not 401"
curl -sf -X POST "$api/v1/tasks" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d '{"text": "The room was spotless and the view was lovely.", "id": "api-1", "source": "api"}'
echo
got=$(curl -sf "$api/v1/tasks/api-1?wait=60" -H "Authorization: Bearer $TOKEN")
echo "$got"
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); assert r["status"] == "done" and r["label"] == "positive", r' "$got" \
  || fail "API task api-1 not done/positive"
[ "$(psql_q "SELECT status || ' ' || label FROM bertstream_results WHERE id = 'api-1'")" = "done positive" ] \
  || fail "api-1 is not a done positive row in PostgreSQL"

texts() {  # prefix count: JSONL with ids prefix-0 .. prefix-(count-1)
  python3 - "$1" "$2" <<'PY'
import json, sys
prefix, count = sys.argv[1], int(sys.argv[2])
good = ["The staff were friendly and the breakfast was excellent.", "这家酒店的服务很好,房间也很干净。",
        "Terrible service, I will never come back.", "房间很脏,服务员态度很差。"]
for i in range(count):
    text = f"{good[i % 4]} ({prefix} review {i}: " + "more words " * (i % 23) + ")"
    print(json.dumps({"id": f"{prefix}-{i}", "text": text}, ensure_ascii=False))
PY
}
check_rows() {  # prefix count: every id exactly one done row
  local got
  got=$(psql_q "SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE status = 'done'),
                       coalesce(max(attempts), 0)
                FROM bertstream_results WHERE id LIKE '$1-%'")
  echo "rows for $1-*: count, distinct ids, done, max attempts = $got (sent $2)"
  [ "$got" = "$2|$2|$2|$(cut -d'|' -f4 <<<"$got")" ] || fail "$1: expected $2 distinct done rows, got $got"
  psql_q "SELECT count(*) FROM bertstream_results WHERE id LIKE '$1-%'
          AND substring(id from length('$1') + 2)::int NOT BETWEEN 0 AND $2 - 1" | grep -qx 0 \
    || fail "$1: rows with unexpected ids"
}
wait_rows() {  # prefix count seconds
  local deadline=$(( $(date +%s) + $3 ))
  while [ "$(psql_q "SELECT count(*) FROM bertstream_results WHERE id LIKE '$1-%'")" -lt "$2" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "$1: not all $2 rows after $3 s"
    sleep 1
  done
}

say "stream through the cli service; SIGKILL the worker mid-stream (a crash)"
# The kill lands as the first rows are stored: the worker is in a flush, and
# the rest of the stream is queued or held unacked. A message that reached
# Redis during the flush stays queued (the worker takes a message and records
# it as unacked in one step), so nothing is lost (docs/guarantees.md).
N=480 CHUNK=16
MESSAGES=$(( N / CHUNK ))
texts crash "$N" > "$workdir/crash.jsonl"
restarts=$(docker inspect -f '{{.RestartCount}}' "$worker")
dc run --rm -T -e BERTSTREAM_BULK_CHUNK_SIZE=$CHUNK cli stream - --source stream --no-progress \
  < "$workdir/crash.jsonl"
held() {  # queued|unacked|rows|messages whose rows are all stored
  echo "$(redis_q LLEN bertstream.bulk)|$(redis_q HLEN unacked)|$(psql_q "
    SELECT count(*), (SELECT count(*) FROM (SELECT substring(id from 7)::int / $CHUNK AS m
                      FROM bertstream_results WHERE id LIKE 'crash-%' GROUP BY 1
                      HAVING count(*) = $CHUNK) AS full_messages)
    FROM bertstream_results WHERE id LIKE 'crash-%'")"
}
deadline=$(( $(date +%s) + 300 ))
while :; do
  IFS='|' read -r queued_now unacked rows full <<<"$(held)"
  [ "$rows" -lt "$N" ] || fail "the stream finished before the kill; send more texts"
  if [ "$rows" -gt 0 ]; then break; fi
  [ "$(date +%s)" -lt "$deadline" ] || fail "no rows stored (last: $(held))"
  sleep 0.1
done
done_before=$rows
echo "at the kill: $queued_now messages queued, $unacked unacked, $full of $MESSAGES done; $rows of $N rows stored"
pid=$(docker inspect -f '{{.State.Pid}}' "$worker")
kill -KILL "$pid"
echo "killed worker pid $pid with $done_before of $N rows stored"
deadline=$(( $(date +%s) + 60 ))
until [ "$(docker inspect -f '{{.RestartCount}}' "$worker")" -gt "$restarts" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the worker did not restart after a crash"
  sleep 1
done
echo "restart count $restarts -> $(docker inspect -f '{{.RestartCount}}' "$worker")"
wait_healthy "$worker" 300
wait_rows crash "$N" 300
check_rows crash "$N"
psql_q "SELECT attempts, count(*) FROM bertstream_results WHERE id LIKE 'crash-%' GROUP BY 1 ORDER BY 1" \
  | sed 's/^/attempts|rows: /'

say "docker kill is a manual stop: no restart"
docker kill "$worker" >/dev/null
sleep 5
[ "$(docker inspect -f '{{.State.Status}}' "$worker")" = exited ] || fail "the worker restarted after docker kill"
echo "worker after docker kill: $(docker inspect -f '{{.State.Status}} (exit {{.State.ExitCode}})' "$worker")"

say "Redis restart with tasks queued and no worker"
M=200
texts queued "$M" > "$workdir/queued.jsonl"
dc run --rm -T -e BERTSTREAM_BULK_CHUNK_SIZE=$CHUNK cli stream - --source queued --no-progress \
  < "$workdir/queued.jsonl"
queue_digest() { redis_q --raw LRANGE bertstream.bulk 0 -1 | sha256sum | cut -c1-16; }
before=$(queued) digest=$(queue_digest)
[ "$before" -eq $(( M / CHUNK + (M % CHUNK > 0) )) ] || fail "expected $(( M / CHUNK + 1 )) queued messages, found $before"
dc restart redis
wait_healthy "$redis" 60
after=$(queued)
echo "queued messages: $before before the Redis restart ($digest), $after after ($(queue_digest))"
[ "$after" = "$before" ] && [ "$(queue_digest)" = "$digest" ] \
  || fail "the queue changed across the Redis restart"
dc start worker-cpu
wait_healthy "$worker" 300
wait_rows queued "$M" 300
check_rows queued "$M"
[ "$(queued)" = 0 ] || fail "messages left in the queue"

say "scale out: docker-compose up -d --scale worker-cpu=2"
dc up -d --no-build --scale worker-cpu=2 worker-cpu
mapfile -t workers < <(dc ps -q worker-cpu)
[ "${#workers[@]}" -eq 2 ] || fail "expected 2 worker-cpu containers, found ${#workers[@]}"
for w in "${workers[@]}"; do wait_healthy "$w" 300; done
beats=$(redis_q --scan --pattern 'bertstream:workers:*' | wc -l)
echo "worker-cpu containers: 2 healthy; heartbeats in Redis: $beats"
[ "$beats" -eq 2 ] || fail "expected 2 worker heartbeats, found $beats"

say "results through the cli service"
dc run --rm -T cli results --aggregate label
echo
echo "PASS: make test-deploy ($(( $(date +%s) - started )) s)"
