"""Model families tilec builds itself (decode-step modules traced by the normal frontend)."""
