"""The stderr filter of multi-process ranks (astra_jax/parallel/stderr_guard.py)
on recorded output: passes everything through until jax's C++ abort begins,
then keeps only our own error lines, or names the lost peer itself."""

import os
import threading

from astra_jax.parallel import distributed, stderr_guard

BAR = b"train:   1%|          | 120/10000 [00:03<04:01, 40.1step/s]"
ABORT = (b"F1201 06:04:32.767602   30025 client.h:86] Terminating process because the JAX "
         b"distributed service detected fatal errors. This most likely indicates that another "
         b"task died\nAdditional GRPC error information from remote target coordination_service "
         b"while calling /xla.coordination.CoordinationService/PollForError:\n"
         b":UNAVAILABLE:Stream removed (Socket closed)\n*** Check failure stack trace: ***\n"
         b"    @     0x7fc87fef81b4  absl::log_internal::LogMessage::SendToLog()\n")


def _filter(chunks, process_id=1, num_processes=2):
  src_r, src_w = os.pipe()
  dst_r, dst_w = os.pipe()
  worker = threading.Thread(target=stderr_guard.guard, args=(src_r, dst_w, process_id,
                                                             num_processes))
  worker.start()
  for chunk in chunks:
    os.write(src_w, chunk)
  os.close(src_w)
  worker.join(timeout=30)
  os.close(dst_w)
  out = b""
  while data := os.read(dst_r, 65536):
    out += data
  os.close(src_r)
  os.close(dst_r)
  return out.decode()


def test_ordinary_output_passes_through_unchanged():
  chunks = [b"resuming from step 10\n", b"\r" + BAR, b"\r" + BAR + b"\n", b"warning: x\n",
            b"no newline at the end"]
  assert _filter(chunks) == b"".join(chunks).decode()


def test_the_abort_becomes_one_line_naming_the_coordinator():
  out = _filter([b"step 1\n", b"\r" + BAR, b"\n" + ABORT[:40], ABORT[40:]])
  lines = [line for line in out.splitlines() if line.strip()]
  assert lines[:2] == ["step 1", BAR.decode()]  # written before the abort began
  assert lines[2:] == [stderr_guard.lost_peer_message(1, 2)]
  assert lines[2].startswith("error: the coordinator (process 0) is gone")


def test_our_own_error_line_wins_over_the_generic_one():
  ours = b"error: process 0 is gone (Connection reset by peer); process 1 stops too.\n"
  out = _filter([ABORT, b"\n", ours])
  assert [line for line in out.splitlines() if line.strip()] == [ours.decode().strip()]


def test_peer_failure_messages():
  gloo = ("UNKNOWN: Gloo AllGather failed: [external/gloo/transport/tcp/pair.cc:547] "
          "Connection closed by peer [127.0.0.1]:53410")
  message = distributed.peer_failure(RuntimeError(gloo), 0, 2)
  assert message.startswith("process 1 at 127.0.0.1:53410 is gone (Connection closed by peer)")
  reset = ("DEADLINE_EXCEEDED: Gloo ReduceScatter timed out: [pair.cc:538] Read error "
           "[127.0.0.1]:10665: Connection reset by peer")
  assert distributed.peer_failure(RuntimeError(reset), 1, 4).startswith(
      "a peer process is gone (Connection reset by peer); process 1 stops too")
  barrier = "INTERNAL: Barrier failed because: Task 1 heartbeat timeout."
  assert "it stopped sending heartbeats" in distributed.peer_failure(RuntimeError(barrier), 0, 2)
  assert distributed.peer_failure(ValueError("shapes do not match"), 0, 2) is None


def test_runtime_log_lines_glued_to_a_bar_are_dropped_with_what_follows():
  warn = (b"W1201 07:58:02.123456   4242 preemption_sync_manager.cc:147] Failed to retrieve "
          b"preemption notice from coordination service: UNAVAILABLE: Stream removed\n")
  ours = b"error: process 0 is gone (Connection reset by peer); process 1 stops too.\n"
  out = _filter([b"\r" + BAR, b" " + warn, b"=== Source Location Trace: ===\n", ours])
  assert [line for line in out.splitlines() if line.strip()] == [BAR.decode() + " ",
                                                                   ours.decode().strip()]


def test_runtime_errors_then_the_abort_give_the_generic_line():
  error = (b"E1201 07:58:02.123456   4242 coordination_service.cc:1518] Use error polling to "
           b"propagate the following error to all tasks: UNAVAILABLE: The following tasks are "
           b"unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.\n")
  out = _filter([b"step 3\n", error, ABORT], process_id=0)
  assert [line for line in out.splitlines() if line.strip()] == [
      "step 3", stderr_guard.lost_peer_message(0, 2)]


def test_runtime_log_lines_without_an_abort_add_no_error():
  warn = b"W1201 07:58:02.123456   4242 client.cc:12] something odd\n"
  out = _filter([b"step 3\n", warn, b"more\n"])
  assert [line for line in out.splitlines() if line.strip()] == ["step 3"]
