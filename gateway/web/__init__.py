"""The web console and JSON API: admins, auditors and clinicians (see app.create_app)."""
