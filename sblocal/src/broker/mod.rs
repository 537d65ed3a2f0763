//! Service Bus semantics over the AMQP engine.
