"""Faults at random moments of a job's life, on the real control plane: the operator
SIGKILLed, the leader of two SIGKILLed, the API server restarted. Each trial watches every
child kind throughout (support.faults.Witness) and asserts that nothing was made twice, that
no two pods of one site or of the server were live at once, that the phases went Pending,
Running, Succeeded and no other way, and that the job ended with its model in the status.
`make bench-faults` runs ten trials of each and prints the figures; these run fewer."""

from __future__ import annotations

from support import faults

EXPECTED_CHILDREN = 17  # examples/breast-cancer.yaml's, as tests/golden/breast-cancer.yaml lists them


def trial(cluster, client, namespace, server_identity, name: str, seed: int) -> faults.Trial:
    return faults.Trial(cluster, client, namespace, server_identity, name=name, seed=seed)


def test_the_operator_sigkilled_at_random_moments_makes_nothing_twice_and_the_job_completes(
    cluster, client, kubelet, namespace, server_identity, tmp_path
):
    operators = faults.Operators(cluster, namespace, namespace, tmp_path / "operators.log")
    try:
        for seed in range(2):
            run = trial(cluster, client, namespace, server_identity, f"killed-{seed}", seed)
            # Two kills each, the first often within the first reconcile (children half made).
            found = run.run(operators.kill, moments=2, span=5.0)
            assert found == [], (
                f"{run.log}: {found}\n{faults.snapshot(client, namespace, run.name)}\n{(tmp_path / 'operators.log').read_text()[-3000:]}"
                f"\n{operators.threads()[-8000:]}"
            )
            assert len([line for line in run.log if "fault at" in line]) == 2, run.log
            # What the watches saw: every child, and the phases in their order.
            assert len(run.witness.children(run.name)) == EXPECTED_CHILDREN, run.witness.children(run.name)
            assert run.witness.phases[run.name][-2:] == ["Running", "Succeeded"], run.witness.phases
    finally:
        operators.stop()


def test_the_leader_sigkilled_another_takes_over_within_15_s_and_the_job_completes(
    cluster, client, kubelet, namespace, server_identity, tmp_path
):
    operators = faults.Operators(cluster, namespace, namespace, tmp_path / "operators.log", replicas=2)
    try:
        run = trial(cluster, client, namespace, server_identity, "leader-killed", seed=7)
        found = run.run(operators.kill, moments=1, span=4.0)
        assert found == [], f"{run.log}: {found}\n{(tmp_path / 'operators.log').read_text()[-3000:]}"
        [took] = operators.takeovers
        assert took < 15, f"the other operator led {took:.1f} s after the leader was killed"
    finally:
        operators.stop()


def test_the_api_server_restarted_mid_job_the_job_completes(cluster, client, kubelet, namespace, server_identity, tmp_path):
    operators = faults.Operators(cluster, namespace, namespace, tmp_path / "operators.log")
    try:
        run = trial(cluster, client, namespace, server_identity, "api-restarted", seed=3)
        found = run.run(faults.api_server_outage(cluster, kubelet), moments=1, span=5.0, timeout=240)
        assert found == [], (
            f"{run.log}: {found}\n{faults.snapshot(client, namespace, run.name)}\n{(tmp_path / 'operators.log').read_text()[-3000:]}"
            f"\n{operators.threads()[-8000:]}"
        )
        assert [line for line in run.log if "fault at" in line], run.log
        # Every worker and the resync came through: a worker that ended on a connection
        # refused during the outage left no job reconciled after a few restarts.
        assert operators.unhealthy() == [], (tmp_path / "operators.log").read_text()[-3000:]
    finally:
        operators.stop()


def test_the_witness_tells_a_child_made_twice_two_live_pods_of_a_site_and_a_phase_gone_back():
    """The checks of the trials can fail: fed the events of a run gone wrong, each is told.
    A key copy made again with the material it held is told apart, not a violation; made
    again with other material, it is one."""
    witness = faults.Witness(client=None, namespace="n")
    job = {"bouquet.dev/job": "j"}

    def saw(kind, event, name, uid, labels=job, data=None, **status):
        witness._saw(kind, event, {"metadata": {"name": name, "uid": uid, "labels": labels}, "data": data or {}, "status": status})

    saw("ConfigMap", "ADDED", "j-job", "1")
    saw("ConfigMap", "DELETED", "j-job", "1")
    saw("ConfigMap", "ADDED", "j-job", "2")
    for uid in ("k1", "k2"):
        saw("Secret", "ADDED", "j--a-key", uid, data={"key": "c2FtZQ=="})
    saw("Secret", "ADDED", "j--b-key", "k3", data={"key": "b25l"})
    saw("Secret", "ADDED", "j--b-key", "k4", data={"key": "b3RoZXI="})
    site = {**job, "bouquet.dev/site": "a", "app.kubernetes.io/component": "site"}
    saw("Pod", "ADDED", "j--a-x", "p1", site, phase="Running")
    saw("Pod", "ADDED", "j--a-y", "p2", site, phase="Pending")
    saw("Pod", "DELETED", "j--a-x", "p1", site, phase="Running")
    for phase in ("Pending", "Running", "Pending", "Running", "Succeeded"):
        saw("FederatedJob", "MODIFIED", "j", "f", {}, phase=phase)
    saw("ConfigMap", "ADDED", "other-job", "3", {"bouquet.dev/job": "other"})
    assert witness.violations("j") == [
        "ConfigMap j-job was made 2 times (uids 1, 2)",
        "Secret j--b-key was made 2 times (uids k3, k4)",
        "2 pods of a were live at once",
        "the job's phases went Pending -> Running -> Pending -> Running -> Succeeded",
    ]
    assert witness.remade("j") == ["j--a-key"]
    assert witness.violations("other") == []
