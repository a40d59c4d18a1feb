"""Flask extensions, created unbound here and bound in create_app (no circular imports).

Flask-Migrate is not here: create_app binds it only for the `flask` command (see there).
"""
from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    """Declarative base for every model (plain typed mappings, no MappedAsDataclass: see docs/libraries.md)."""


db = SQLAlchemy(model_class=Base)
