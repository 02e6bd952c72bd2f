"""JSON views: product list/detail/create, and placing an order (writes in one transaction)."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import DataError, IntegrityError, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

from .models import Order, OrderLine, Product


class Rejected(Exception):
    """The request cannot be served as asked; rolls back the transaction it is raised in."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _body(request: HttpRequest) -> dict[str, Any]:
    try:
        data = json.loads(request.body or b"{}")
    except ValueError:
        raise Rejected("the body is not JSON") from None
    if not isinstance(data, dict):
        raise Rejected("the body must be a JSON object")
    if _has_nul(data):
        # PostgreSQL text cannot hold NUL: refuse it here rather than fail in the database.
        raise Rejected("text must not contain NUL (\\u0000) characters")
    return data


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _checked(obj: Any) -> None:
    """Run the model's field validators (max_digits, integer range, no NUL byte...)."""
    try:
        # Uniqueness is left to the database: a concurrent insert would pass a query check.
        obj.full_clean(validate_unique=False, validate_constraints=False)
    except ValidationError as exc:
        fields = "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
        raise Rejected(f"invalid {type(obj).__name__.lower()}: {fields}") from None


def _out_of_range(exc: DataError) -> Rejected:
    # What the validators let through and the database refuses: still the client's input.
    first_line = (str(exc).strip().splitlines() or ["invalid value"])[0]
    return Rejected(f"a value is out of range: {first_line}")


def _rejected(exc: Rejected) -> JsonResponse:
    return JsonResponse({"error": str(exc)}, status=exc.status)


@require_GET
def index(request: HttpRequest) -> JsonResponse:
    pages = {"products": "/products/", "orders": "/orders/ (POST)"}
    if settings.POOLKIT_DASHBOARD:
        pages["dashboard"] = "/poolkit/dashboard/"
    return JsonResponse({**pages, "health": "/poolkit/health", "metrics": "/poolkit/metrics"})


@csrf_exempt
@require_http_methods(["GET", "POST"])
def products(request: HttpRequest) -> JsonResponse:
    if request.method == "GET":
        return JsonResponse({"products": [p.as_dict() for p in Product.objects.all()]})
    try:
        data = _body(request)
        try:
            product = Product(
                name=str(data["name"]),
                price=Decimal(str(data["price"])),
                stock=int(data.get("stock", 0)),
            )
        except (KeyError, TypeError, ValueError, OverflowError, InvalidOperation):
            raise Rejected("give name, price and (optionally) stock") from None
        _checked(product)
        try:
            product.save(force_insert=True)
        except IntegrityError:
            raise Rejected(f"a product named {data['name']!r} exists", 409) from None
        except DataError as exc:
            raise _out_of_range(exc) from None
    except Rejected as exc:
        return _rejected(exc)
    return JsonResponse(product.as_dict(), status=201)


@require_GET
def product(request: HttpRequest, pk: int) -> JsonResponse:
    found = Product.objects.filter(pk=pk).first()
    if found is None:
        return JsonResponse({"error": "no such product"}, status=404)
    return JsonResponse(found.as_dict())


@csrf_exempt
@require_http_methods(["POST"])
def place_order(request: HttpRequest) -> JsonResponse:
    """Create the order, its lines and take the stock, all or nothing."""
    try:
        data = _body(request)
        lines = data.get("lines")
        if not isinstance(lines, list) or not lines:
            raise Rejected("give lines: [{product, quantity}, ...]")
        order = Order(customer=str(data.get("customer", "anonymous")))
        _checked(order)
        with transaction.atomic():
            order.save(force_insert=True)
            for line in lines:
                try:
                    pk, quantity = int(line["product"]), int(line["quantity"])
                except (KeyError, TypeError, ValueError, OverflowError):
                    raise Rejected("each line needs product and quantity") from None
                item = Product.objects.select_for_update().filter(pk=pk).first()
                if item is None:
                    raise Rejected(f"no product {pk}", 404)
                if quantity < 1:
                    raise Rejected(f"quantity must be at least 1, not {quantity}")
                if item.stock < quantity:
                    raise Rejected(f"only {item.stock} of {item.name!r} left", 409)
                item.stock -= quantity
                item.save(update_fields=["stock"])
                OrderLine.objects.create(
                    order=order, product=item, quantity=quantity, price=item.price
                )
    except DataError as exc:
        return _rejected(_out_of_range(exc))
    except Rejected as exc:
        return _rejected(exc)
    return JsonResponse(order.as_dict(), status=201)


@require_GET
def order(request: HttpRequest, pk: int) -> JsonResponse:
    found = Order.objects.filter(pk=pk).prefetch_related("lines").first()
    if found is None:
        return JsonResponse({"error": "no such order"}, status=404)
    return JsonResponse(found.as_dict())
