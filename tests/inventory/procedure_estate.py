"""A small estate with procedure steps, shared by the tests of steps (not a test module)."""

from __future__ import annotations

ESTATE = """
waves:
  - {name: core, services: [identity]}
  - {name: icu, services: [icu]}
  - {name: rest, services: ["*"]}
sites:
  - {name: arl, kind: hospital}
pools:
  - {name: backup-streams, capacity: 2}
roles:
  - name: dc
    kind: server
    services: [identity]
    restore_method: backup
    pools: {restore: [backup-streams]}
  - name: icu-ws
    kind: workstation
    department: icu
    services: [icu]
    golden_image: win11
    depends_on: [dc-01]
  - name: files
    kind: server
    services: [files]
    restore_method: backup
hosts:
  - {name: dc-01, role: dc, site: arl}
  - {name: dc-02, role: dc, site: arl, depends_on: [dc-01]}
  - {name: "ws-icu-[1:3]", role: icu-ws, site: arl}
  - {name: fs-01, role: files, site: arl}
"""

STEPS = """
procedures:
  - name: reset-1
    runs_on: {host: dc-01}
    needs: [{host: dc-01, stage: verify}]
    command: "Reset-Krbtgt -Server {host}"
    generates: [KRBTGT_PASSWORD]
    gates:
      - {hosts: [dc-01], before: release}
      - {kind: workstation}
  - name: reset-2
    runs_on: {host: dc-01}
    needs: [{host: dc-01, stage: verify}]
    not_before: {step: reset-1, after: 10h, reason: ticket lifetime}
    command: "Reset-Krbtgt -Server {host}"
    gates:
      - {role: files}
  - name: vault
    needs: [reset-1]
    http: {url: "https://vault.example/rotate", status: 202}
    minutes: 30
    repeatable: true
"""
