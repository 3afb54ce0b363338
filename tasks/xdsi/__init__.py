"""XDS-I.b Imaging Document Source (README "Sharing through XDS-I.b"): one DICOM KOS manifest per
cataloged study, submitted to an XDS.b repository (RAD-68 = ITI-41 with MTOM), the referenced
instances served by RAD-69 (in ``pacsflow serve``) and WADO-RS, each export audited (ATNA).

Modules: :mod:`.manifest` (the KOS, pure), :mod:`.ebxml` (the submission's metadata, pure),
:mod:`.mtom` (SOAP 1.2 envelopes and multipart/related XOP packages, pure), :mod:`.client` (the
repository's network boundary), :mod:`.ledger` (per-study publish state and consent),
:mod:`.audit` (DICOM audit messages over syslog), :mod:`.rad69` (RAD-69 requests and responses;
the route is :mod:`pacsflow.tasks.web.xdsi`, in ``pacsflow serve``).

For a research affinity domain only: patient IDs are pseudonyms, and nothing identified is sent.
"""
