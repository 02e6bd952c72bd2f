"""Products and orders: enough for list/detail/create views and one multi-write transaction."""

from django.db import models


class Product(models.Model):
    name = models.CharField(max_length=100, unique=True)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    stock = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["id"]

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "price": f"{self.price:.2f}", "stock": self.stock}


class Order(models.Model):
    customer = models.CharField(max_length=100)
    created = models.DateTimeField(auto_now_add=True)

    def as_dict(self) -> dict[str, object]:
        lines = [
            {"product": line.product_id, "quantity": line.quantity, "price": str(line.price)}
            for line in self.lines.all()
        ]
        total = sum(line.price * line.quantity for line in self.lines.all())
        return {"id": self.id, "customer": self.customer, "lines": lines, "total": str(total)}


class OrderLine(models.Model):
    order = models.ForeignKey(Order, related_name="lines", on_delete=models.CASCADE)
    product = models.ForeignKey(Product, on_delete=models.PROTECT)
    quantity = models.PositiveIntegerField()
    price = models.DecimalField(max_digits=10, decimal_places=2)
