"""Training functions of your own under gradwatch (README: "Your own training loop")."""
