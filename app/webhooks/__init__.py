"""Webhook notifications: signing, URL checks and the HTTP sender."""
