"""Deliver: delivery rows and their states, the channels (DICOM SR by C-STORE, FHIR by HTTP),
their clients and the objects they send (docs/architecture.md, "Deliver")."""
