from django.urls import path

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("products/", views.products, name="products"),
    path("products/<int:pk>/", views.product, name="product"),
    path("orders/", views.place_order, name="place-order"),
    path("orders/<int:pk>/", views.order, name="order"),
]
