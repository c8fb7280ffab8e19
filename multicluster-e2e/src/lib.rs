//! The multi-cluster harness and end-to-end scenarios (issue "Embedded
//! multi-cluster demo and end-to-end suite"). It needs the controller,
//! gateway and sidecar, so it is empty until those exist; the scenarios it
//! will run are listed in `docs/architecture.md`.
